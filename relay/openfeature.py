"""An OpenFeature provider (`openfeature-sdk`) over `relay.client.RelayClient`, so that a
Python service that already evaluates flags through OpenFeature switches to relay with one line:

    provider = RelayProvider(RelayClient("wss://flags.example.com/v1/stream", "sdk-key"))
    await provider.start()              # connects, waits for the flags (in your event loop)
    api.set_provider(provider)          # openfeature.api

Evaluations read the flags the client holds (no I/O), so they may be called from any thread.
Events: PROVIDER_CONFIGURATION_CHANGED with the keys of each change, PROVIDER_STALE while
disconnected, PROVIDER_READY when connected again, PROVIDER_ERROR when the key is refused.
Needs `pip install openfeature-sdk` (the `openfeature` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode, ProviderFatalError, ProviderNotReadyError
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata

from relay.client import ChangeEvent, RelayClient

T = TypeVar("T")
_MISSING = object()


class RelayProvider(AbstractProvider):
    def __init__(self, client: RelayClient, ready_timeout: float = 10.0) -> None:
        super().__init__()
        self.client = client
        self.ready_timeout = ready_timeout
        self._stale = False
        self._not_ready = False
        # Chain the client's callbacks: its owner may have set its own.
        before_change, before_status = client.on_change, client.on_status
        client.on_change = _chain(before_change, self._changed)
        client.on_status = _chain(before_status, self._status)

    async def start(self) -> None:
        """Start the client (in the running loop) and wait for its flags; raises
        `relay.client.RelayClientError` if the key is refused, TimeoutError if none come."""
        await self.client.start()
        await self.client.wait_ready(self.ready_timeout)

    def get_metadata(self) -> Metadata:
        return Metadata(name="relay")

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Set as a provider before `start()` has brought flags: not ready (the SDK serves
        defaults meanwhile, and says why)."""
        if self.client.version is None:
            self._not_ready = True  # PROVIDER_READY once flags come
            if self.client.error is not None:
                raise ProviderFatalError(str(self.client.error))
            raise ProviderNotReadyError("relay: no flags yet; await provider.start() first")

    def shutdown(self) -> None:
        """The client is the caller's to close (`await client.close()`, in its loop)."""

    # --- evaluation -----------------------------------------------------------------------------

    def resolve_boolean_details(self, flag_key: str, default_value: bool,
                                evaluation_context: EvaluationContext | None = None,
                                ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, (bool,), "a boolean")

    def resolve_string_details(self, flag_key: str, default_value: str,
                               evaluation_context: EvaluationContext | None = None,
                               ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, (str,), "a string")

    def resolve_integer_details(self, flag_key: str, default_value: int,
                                evaluation_context: EvaluationContext | None = None,
                                ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, (int,), "an integer")

    def resolve_float_details(self, flag_key: str, default_value: float,
                              evaluation_context: EvaluationContext | None = None,
                              ) -> FlagResolutionDetails[float]:
        details = self._resolve(flag_key, default_value, (int, float), "a number")
        if details.error_code is None:  # JSON's 3 is a float here, as the SDK checks
            details.value = float(details.value)
        return details

    def resolve_object_details(self, flag_key: str, default_value: Any,
                               evaluation_context: EvaluationContext | None = None,
                               ) -> FlagResolutionDetails[Any]:
        return self._resolve(flag_key, default_value, (dict, list), "an object or a list")

    def _resolve(self, key: str, default: T, types: tuple[type, ...], what: str,
                 ) -> FlagResolutionDetails[T]:
        version = self.client.version
        metadata: dict[str, int | float | str | bool] = {} if version is None else {
            "version": version}
        value = self.client.get(key, _MISSING)
        if value is _MISSING:
            return FlagResolutionDetails(
                default, ErrorCode.FLAG_NOT_FOUND, f"no flag {key} in this environment",
                Reason.ERROR, flag_metadata=metadata)
        # bool is an int in Python; JSON keeps them apart, and so does this.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return FlagResolutionDetails(
                default, ErrorCode.TYPE_MISMATCH,
                f"flag {key} is {type(value).__name__}, not {what}", Reason.ERROR,
                flag_metadata=metadata)
        reason = Reason.STATIC if self.client.status == "ready" else Reason.CACHED
        return FlagResolutionDetails(cast(T, value), reason=reason, flag_metadata=metadata)

    # --- events ---------------------------------------------------------------------------------

    def _changed(self, event: ChangeEvent) -> None:
        changed = sorted(event.changed)
        if changed:
            self.emit_provider_configuration_changed(ProviderEventDetails(
                flags_changed=changed, metadata={"version": event.v}))

    def _status(self, status: str) -> None:
        if status == "reconnecting" and not self._stale:
            self._stale = True
            self.emit_provider_stale(ProviderEventDetails(
                message="relay: disconnected, flags may be out of date"))
        elif status == "ready" and (self._stale or self._not_ready):
            self._stale = self._not_ready = False
            self.emit_provider_ready(ProviderEventDetails(message="relay: connected"))
        elif status == "closed" and self.client.error is not None:
            self.emit_provider_error(ProviderEventDetails(
                message=str(self.client.error), error_code=ErrorCode.PROVIDER_FATAL))


def _chain(first: Callable[[Any], None] | None, then: Callable[[Any], None],
           ) -> Callable[[Any], None]:
    if first is None:
        return then

    def both(value: Any) -> None:
        first(value)
        then(value)

    return both


__all__: Sequence[str] = ("RelayProvider",)
