"""qcownbd: an asyncio NBD server for QCOW1 and raw disk images."""

__version__ = "0.1.0"
