// Package service wires lazypull's parts together once: the chunk cache,
// the registry client and the layer manager, configured from one Config.
// The daemon (cmd/snapshotter) and `lazypull mount` both build a Service;
// the daemon also hands its LayerFS to the snapshotter, which turns
// containerd's snapshot labels into mounts of remote layers.
//
// The TOML configuration (Config, LoadConfig) lives here too, so that the
// defaults the daemon documents are the ones the library and the CLI use.
package service
