"""The ``sanlock`` backend: disk-paxos leases on shared storage via the sanlock daemon.

Shape (the same as libvirt's sanlock plugin): the wrapper registers with the
local sanlock daemon, acquires one lease per disk (and the domain lease)
with that registration, and execs QEMU with the registration fd inherited.
The daemon ties the leases to the registering pid, so they live exactly as
long as QEMU does; closing the fd (or QEMU dying) releases them all.

Lease layout.  ``sanlock_path``/``sanlock_offset`` hold the lockspace (one
1 MiB area of delta leases, one per host id).  The resource area
(``sanlock_resources``, or the space right after the lockspace when that is
empty) is an array of 1 MiB paxos-lease slots:

* slot 0 is the *allocator* lease, named ``qemu-locked-slots-<N>``: it
  records the slot count on the storage itself (so growing the file can
  never remap keys) and serialises the creation of new leases;
* a resource key (``file:/real/path``, ``wwid:...``, ``lvm:...``, ``domain:<uuid>``)
  is named ``qlk-`` + 40 hex digits of its SHA-256 (sanlock names are 48
  bytes); its home slot is ``1 + hash mod (N-1)``; on collision the next
  slots are probed linearly.  A lease, once written, is never moved or
  rewritten, so every host finds it in the same slot; a missing lease is
  created on demand while holding the allocator lease, after re-reading the
  slot under it, so two hosts can never write one slot.

Errors: 11 EAGAIN, 16 EBUSY and -245 are transient (retried with bounded
backoff); 17 EEXIST (held on this host) and -243 (held by another host)
refuse with LockedError naming the holder's host id and name (the name the
holder's daemon wrote into its delta lease: ``sanlock daemon -e NAME``).

The binding is Debian's python3-sanlock extension, loaded from its file
(binding.py; docs/sanlock.md).  This package is imported only
when ``backend = "sanlock"`` and imports nothing heavy on the start path.
"""
