"""phalanx.comm: the data plane — authenticated TCP links, ring/tree collectives, codecs.

Build a static group from ranks, addresses and the cluster secret::

    from phalanx.comm import Group, bind
    listener = bind("127.0.0.1:0")            # publish listener.address to the others
    group = Group(rank, addresses, secret, listener=listener)
    group.all_reduce(grads, op="avg", codec="int8")
"""

from phalanx.comm.group import Group, Handle
from phalanx.comm.options import CommOptions
from phalanx.comm.plan import OpInfo
from phalanx.comm.transport import Listener, bind

__all__ = ["CommOptions", "Group", "Handle", "Listener", "OpInfo", "bind"]
