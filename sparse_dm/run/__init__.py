"""One run: config checks, building it, where it starts (resume/init), its folder, loading a trained module,
the exported `.sdm` file and summary.json. Commands are thin over this package."""
