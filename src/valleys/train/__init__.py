"""The workbench's training code (built on the library, never imported by it)."""
