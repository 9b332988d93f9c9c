"""Worker classes (plain Python) that the launch code wraps as Ray actors."""
