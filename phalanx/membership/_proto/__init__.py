"""Generated from proto/phalanx/v1/ by `python scripts/gen_proto.py`.

Generator: grpcio-tools 1.85.1.

DO NOT EDIT. Only phalanx.membership imports these modules.
"""
