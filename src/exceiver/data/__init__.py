"""Data: AnnData -> gene vocabulary -> checked counts -> scaler -> tokens and batches.

Nothing here imports the network: data flows one way, into `exceiver.nn`."""
