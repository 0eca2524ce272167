/** relay's JavaScript client: live feature flags for browsers, React Native and Node. */

export {
  type ChangeEvent,
  type Logger,
  type NetworkSource,
  RelayClient,
  type RelayClientOptions,
  RelayRefusedError,
  type Status,
  type VisibilitySource,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export type { StorageLike } from "./cache.js";
export type { FlagEntry } from "./flags.js";
export { RelayWebProvider, type RelayWebProviderOptions } from "./openfeature.js";
