"""kvbridge.copy: the GPU<->host block copy engine shared by the connectors.

``backend`` (interface, run planning, handles, lazy registry; torch-free), ``cpu`` and
``cuda`` (backends), ``staged`` (serial and pipelined staged sequences), ``triton_copier``
(the zero-copy ``direct`` kernel). Used by the CPU tier (``kvbridge.offload``) and NIXL's host
staging (``kvbridge.nixl.staging``); it imports neither.
"""
