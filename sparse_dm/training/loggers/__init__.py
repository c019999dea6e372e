"""Where metrics go: W&B (offline by default), the CSV history that survives resume, console noise filters."""
