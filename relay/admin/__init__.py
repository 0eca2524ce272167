"""The internal admin API (`api`) and its one client (`client`, the CLI's and the tests')."""
