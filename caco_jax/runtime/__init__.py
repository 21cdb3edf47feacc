"""What every stage runs on: storage (local folders and bucket URLs), the workdir's names, the
device mesh, multi-host runs, checkpoints, metrics, progress bars, worker processes, and a frozen
model over batches on every device (`inference`)."""
