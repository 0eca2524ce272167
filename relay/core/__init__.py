"""The sans-I/O core: plain classes and functions, no sockets, no event loop, no files.

The wire protocol and its codec, environment state and history, the fan-out's decisions, the
ring, drain pacing, and the public port's parsers and budgets. Unit- and property-tested
without I/O (`pytest -m pure`)."""
