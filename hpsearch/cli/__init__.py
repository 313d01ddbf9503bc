"""The `hpsearch` command line: its commands, their two ways to a study, and Rich rendering."""
