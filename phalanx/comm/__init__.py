"""phalanx.comm: the data plane — authenticated TCP links, ring/tree collectives, codecs.

Build a static group from ranks, addresses and the cluster secret::

    from phalanx.comm import Group, bind
    listener = bind("127.0.0.1:0")            # publish listener.address to the others
    group = Group(rank, addresses, secret, listener=listener)
    group.all_reduce(grads, op="avg", codec="int8")      # -> OpResult

Every collective is ``group.run(OpSpec(...), array)``; the named methods build the
spec. ``Handle``, ``OpResult``, ``OpSpec`` and ``Deadline`` are the package-wide classes
(:mod:`phalanx.ops`, :mod:`phalanx.deadline`), re-exported here.
"""

from phalanx.comm.group import Group
from phalanx.comm.options import CommOptions
from phalanx.comm.transport import Listener, bind
from phalanx.deadline import Deadline
from phalanx.ops import Handle, OpResult, OpSpec

__all__ = ["CommOptions", "Deadline", "Group", "Handle", "Listener", "OpResult", "OpSpec", "bind"]
