"""convserve service: batched predictor, HTTP contract and the Ray Serve deployment around it."""
