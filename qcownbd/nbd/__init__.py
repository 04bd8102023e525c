"""The NBD protocol: wire codec, option negotiation, connections and the listener."""
