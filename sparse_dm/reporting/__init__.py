"""Tables, plots and studies made from finished runs' summary.json files (no training, no models)."""
