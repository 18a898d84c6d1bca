"""Tables, plots and reports built from run directories (they read results, never retrain)."""
