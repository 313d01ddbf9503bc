"""The worker runtime: claiming trials, training them with heartbeats, and the embedded
`hpsearch run`."""
