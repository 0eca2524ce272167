"""Durable stores behind one interface (`relay.store.base.Store`)."""
