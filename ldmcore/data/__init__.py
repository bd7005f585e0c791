"""Data sources: each yields batches keyed as its ``provides`` declares."""
