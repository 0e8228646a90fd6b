"""kvbridge.kit: what an engine embeds to drive kvbridge's connectors.

``TransferTracker`` (the scheduler's transfer bookkeeping), ``BlockHasher`` (chained block
hashes), ``run_worker_step`` (one worker-side step of the hooks), ``ConnectorDriver`` (both
halves stepped in one process, for tests), the ConnectorOutput wire codec and queries on
connector state. Torch-free.
"""
