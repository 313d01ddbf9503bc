"""The service layer: studies, results, uploads and tokens over the store; what the API and
the CLI call."""
