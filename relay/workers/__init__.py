"""A node of several processes (`relay serve --workers N`): the primary's pool of workers, the
notice channel between them, and one `/metrics` for all of them."""
