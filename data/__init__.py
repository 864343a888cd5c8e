"""Data sets: one prepare.py per folder, and loader.py, which turns their files into batches."""
