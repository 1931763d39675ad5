"""Serving: what the prediction service runs (bundles, batching, routing, auth, the prediction log)."""
