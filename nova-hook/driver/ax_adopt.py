# AX's adopting compute driver for Nova (Zed), installed as nova/virt/ax_adopt.py.
#
# When axd promotes a server's domain on this host, Nova still records the
# dead host; axd evacuates the server here (nova-hook/FAILOVER.md). Nova's
# rebuild would refuse the running domain (InstanceExists) or, past that,
# spawn over it. This driver adopts it instead, for the instances axd
# marked as promoted here: a file named after the instance UUID in
# [ax] adopt_dir, written by axd at promotion and removed once Nova says
# this host. Every other rebuild is Nova's own.
#
# nova.conf on a compute host running axd:
#   [DEFAULT]
#   compute_driver = ax_adopt.LibvirtAdoptDriver
#   [ax]
#   adopt_dir = /var/lib/ax/nova-adopt
#
# Nova loads drivers from its nova.virt package only (load_compute_driver),
# so the module lives there: unsupported upstream, re-check at every Nova
# update (it follows ComputeManager._do_rebuild_instance of Zed).

import os
import re

from eventlet import greenthread
from oslo_config import cfg
from oslo_log import log as logging

from nova.compute import task_states
from nova import exception
from nova.virt import event as virtevent
from nova.virt.libvirt import driver as libvirt_driver

LOG = logging.getLogger(__name__)

CONF = cfg.CONF
CONF.register_opts([
    cfg.StrOpt('adopt_dir', default='/var/lib/ax/nova-adopt',
               help='Where axd marks the instances it promoted on this '
                    'host (a file per instance UUID): axd --nova-adopt-dir.'),
    cfg.FloatOpt('pause_grace', default=2.0, min=0,
                 help='Seconds a guest pause is kept from the compute '
                      'manager, dropped with its resume if that comes '
                      'within them: AX pauses an FT guest for each '
                      'checkpoint, many times a second. 0 passes every '
                      'pause on.'),
], group='ax')

_UUID = re.compile(r'\A[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\Z')


class AdoptMixin(object):
    """Adopts the domain axd promoted here when Nova evacuates its server.

    Put it before the driver class it adopts for:
    class LibvirtAdoptDriver(AdoptMixin, LibvirtDriver).
    """

    def ax_promoted(self, instance):
        """Whether axd marked instance as promoted on this host."""
        uuid = getattr(instance, 'uuid', None) or ''
        if not _UUID.match(uuid):
            return False
        return os.path.isfile(os.path.join(CONF.ax.adopt_dir, uuid.lower()))

    def instance_exists(self, instance):
        # The running domain is the one the evacuation is for: Nova's
        # _check_instance_exists must not refuse it (InstanceExists).
        if self.ax_promoted(instance):
            return False
        return super(AdoptMixin, self).instance_exists(instance)

    def rebuild(self, context, instance, image_meta, injected_files,
                admin_password, allocations, bdms, detach_block_devices,
                attach_block_devices, network_info=None, evacuate=False,
                block_device_info=None, preserve_ephemeral=False,
                accel_uuids=None, reimage_boot_volume=False):
        if not (evacuate and self.ax_promoted(instance)):
            # Nova's own rebuild: the driver's, or NotImplementedError,
            # on which the manager runs its default one.
            return super(AdoptMixin, self).rebuild(
                context, instance, image_meta, injected_files,
                admin_password, allocations, bdms, detach_block_devices,
                attach_block_devices, network_info=network_info,
                evacuate=evacuate, block_device_info=block_device_info,
                preserve_ephemeral=preserve_ephemeral,
                accel_uuids=accel_uuids,
                reimage_boot_volume=reimage_boot_volume)
        if any(getattr(bdm, 'is_volume', False) for bdm in bdms or []):
            # AX replicates local disks; a volume's attachment would stay
            # the dead host's.
            raise exception.NovaException(
                'AX adopts instances with local disks only; instance %s '
                'has volumes' % instance.uuid)
        # The task states the manager's default rebuild steps through: its
        # final save expects REBUILD_SPAWNING.
        instance.task_state = task_states.REBUILD_BLOCK_DEVICE_MAPPING
        instance.save(expected_task_state=[task_states.REBUILDING])
        instance.task_state = task_states.REBUILD_SPAWNING
        instance.save(
            expected_task_state=[task_states.REBUILD_BLOCK_DEVICE_MAPPING])
        # The port bindings are this host's now; the domain's taps exist
        # (axd started it), plugging makes sure they are wired here.
        self.plug_vifs(instance, network_info or [])
        self.ax_adopt(context, instance, network_info)
        LOG.info('AX: adopted the running domain of instance %s, promoted '
                 'here by axd: no spawn', instance.uuid, instance=instance)

    # FT pauses the guest for each checkpoint (tens of milliseconds, many
    # times a second), and libvirt reports each pause and resume. Passed
    # on, every one makes the compute manager read the domain, write its
    # power state and log "paused unexpectedly". A pause is held for
    # [ax] pause_grace instead, like Nova's host holds a STOPPED for a
    # reboot's STARTED: a resume within it drops both; a longer pause
    # reaches Nova that much later, and any other event of the instance
    # sends the held pause first.
    _ax_spawn_after = staticmethod(greenthread.spawn_after)

    def emit_event(self, event):
        if not isinstance(event, virtevent.LifecycleEvent):
            return super(AdoptMixin, self).emit_event(event)
        held = self.__dict__.setdefault('_ax_paused', {})
        uuid = event.get_instance_uuid()
        pending = held.pop(uuid, None)
        if pending is not None:
            pending[0].cancel()
            if event.get_transition() == virtevent.EVENT_LIFECYCLE_RESUMED:
                return
            super(AdoptMixin, self).emit_event(pending[1])
        grace = CONF.ax.pause_grace
        if event.get_transition() == virtevent.EVENT_LIFECYCLE_PAUSED and \
                grace > 0:
            held[uuid] = (self._ax_spawn_after(grace, self._ax_release,
                                               event), event)
            return
        super(AdoptMixin, self).emit_event(event)

    def _ax_release(self, event):
        held = self.__dict__.setdefault('_ax_paused', {})
        pending = held.get(event.get_instance_uuid())
        if pending is not None and pending[1] is event:
            del held[event.get_instance_uuid()]
            super(AdoptMixin, self).emit_event(event)

    def ax_adopt(self, context, instance, network_info):
        """What the driver underneath needs to know of the adopted domain
        (libvirt: nothing, it reads the domain by UUID)."""


class LibvirtAdoptDriver(AdoptMixin, libvirt_driver.LibvirtDriver):
    """Nova's libvirt driver, adopting what axd promoted here."""
