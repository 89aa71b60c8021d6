# Unit tests of the adopting mixin, without a running Nova:
#   /usr/bin/python3 -m unittest test_ax_adopt   (in nova-hook/driver)
import os
import shutil
import tempfile
import unittest

from nova.compute import task_states
from nova import exception
from nova.virt import event as virtevent

import ax_adopt

UUID = '5b9f0c3e-2d1a-4f7b-9a8e-6c4d3b2a1f00'


class Instance(object):
    """An instance whose saves check the task state they expect."""

    def __init__(self, uuid=UUID):
        self.uuid = uuid
        self.task_state = task_states.REBUILDING
        self.saved = []
        self._last = task_states.REBUILDING

    def save(self, expected_task_state=None):
        if expected_task_state is not None and \
                self._last not in expected_task_state:
            raise exception.UnexpectedTaskStateError(
                instance_uuid=self.uuid, expected=expected_task_state,
                actual=self._last)
        self._last = self.task_state
        self.saved.append(self.task_state)


class Base(object):
    """The driver underneath: a domain exists, rebuild is Nova's own."""

    def __init__(self):
        self.plugged = None
        self.emitted = []

    def emit_event(self, event):
        self.emitted.append((event.get_instance_uuid(),
                             event.get_transition()))

    def instance_exists(self, instance):
        return True

    def rebuild(self, *args, **kwargs):
        raise NotImplementedError()

    def plug_vifs(self, instance, network_info):
        self.plugged = (instance.uuid, network_info)


class Driver(ax_adopt.AdoptMixin, Base):
    adopted = None

    def ax_adopt(self, context, instance, network_info):
        self.adopted = instance.uuid


class Timer(object):
    """A greenthread.spawn_after stand-in the test fires by hand."""

    def __init__(self, after, fn, *args):
        self.after, self.fn, self.args = after, fn, args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def fire(self):
        if not self.cancelled:
            self.fn(*self.args)


class Volume(object):
    is_volume = True


class AdoptMixinTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        ax_adopt.CONF.set_override('adopt_dir', self.dir, group='ax')
        self.addCleanup(ax_adopt.CONF.clear_override, 'adopt_dir',
                        group='ax')

    def mark(self, uuid=UUID):
        with open(os.path.join(self.dir, uuid), 'w') as f:
            f.write('instance-0000002a\n')

    def rebuild(self, drv, inst, evacuate=True, bdms=()):
        return drv.rebuild(None, inst, None, [], 'pw', {}, list(bdms),
                           None, None, network_info=['vif'],
                           evacuate=evacuate)

    def test_adopts_what_axd_promoted(self):
        self.mark()
        drv, inst = Driver(), Instance()
        self.assertFalse(drv.instance_exists(inst))
        self.rebuild(drv, inst)
        self.assertEqual(inst.saved, [task_states.REBUILD_BLOCK_DEVICE_MAPPING,
                                      task_states.REBUILD_SPAWNING])
        self.assertEqual(drv.plugged, (UUID, ['vif']))
        self.assertEqual(drv.adopted, UUID)

    def test_nova_rebuilds_the_others(self):
        drv, inst = Driver(), Instance()
        self.assertTrue(drv.instance_exists(inst))
        self.assertRaises(NotImplementedError, self.rebuild, drv, inst)
        self.assertEqual(inst.saved, [])
        self.assertIsNone(drv.adopted)

    def test_a_plain_rebuild_is_novas(self):
        self.mark()
        drv, inst = Driver(), Instance()
        self.assertRaises(NotImplementedError, self.rebuild, drv, inst,
                          evacuate=False)
        self.assertIsNone(drv.adopted)

    def test_only_uuids_name_markers(self):
        os.mkdir(os.path.join(self.dir, 'sub'))
        drv = Driver()
        for uuid in ('../' + UUID, 'sub', '', UUID + '/', None):
            self.assertFalse(drv.ax_promoted(Instance(uuid)), uuid)
        self.mark(UUID.upper())
        self.assertFalse(drv.ax_promoted(Instance(UUID.upper())),
                         'axd writes lower-case names')

    def test_volumes_are_refused(self):
        self.mark()
        drv, inst = Driver(), Instance()
        self.assertRaises(exception.NovaException, self.rebuild, drv, inst,
                          bdms=[Volume()])
        self.assertIsNone(drv.adopted)

    def events(self):
        drv, timers = Driver(), []

        def spawn_after(after, fn, *args):
            timers.append(Timer(after, fn, *args))
            return timers[-1]
        drv._ax_spawn_after = spawn_after
        return drv, timers

    def send(self, drv, transition, uuid=UUID):
        drv.emit_event(virtevent.LifecycleEvent(uuid, transition))

    def test_checkpoint_pauses_do_not_reach_nova(self):
        drv, timers = self.events()
        for _ in range(3):
            self.send(drv, virtevent.EVENT_LIFECYCLE_PAUSED)
            self.send(drv, virtevent.EVENT_LIFECYCLE_RESUMED)
        self.assertEqual(drv.emitted, [])
        self.assertEqual([t.after for t in timers], [2.0] * 3)
        for t in timers:
            t.fire()
        self.assertEqual(drv.emitted, [], 'a cancelled pause went out')

    def test_a_long_pause_reaches_nova_late(self):
        drv, timers = self.events()
        self.send(drv, virtevent.EVENT_LIFECYCLE_PAUSED)
        self.assertEqual(drv.emitted, [])
        timers[0].fire()
        self.send(drv, virtevent.EVENT_LIFECYCLE_RESUMED)
        self.assertEqual(drv.emitted, [
            (UUID, virtevent.EVENT_LIFECYCLE_PAUSED),
            (UUID, virtevent.EVENT_LIFECYCLE_RESUMED)])

    def test_other_events_send_the_held_pause_first(self):
        drv, timers = self.events()
        other = UUID.replace('5b9f', '6c0a')
        self.send(drv, virtevent.EVENT_LIFECYCLE_PAUSED)
        self.send(drv, virtevent.EVENT_LIFECYCLE_STOPPED, other)
        self.send(drv, virtevent.EVENT_LIFECYCLE_STOPPED)
        timers[0].fire()
        self.assertEqual(drv.emitted, [
            (other, virtevent.EVENT_LIFECYCLE_STOPPED),
            (UUID, virtevent.EVENT_LIFECYCLE_PAUSED),
            (UUID, virtevent.EVENT_LIFECYCLE_STOPPED)])

    def test_no_grace_passes_pauses_on(self):
        ax_adopt.CONF.set_override('pause_grace', 0, group='ax')
        self.addCleanup(ax_adopt.CONF.clear_override, 'pause_grace',
                        group='ax')
        drv, timers = self.events()
        self.send(drv, virtevent.EVENT_LIFECYCLE_PAUSED)
        self.send(drv, virtevent.EVENT_LIFECYCLE_RESUMED)
        self.assertEqual(timers, [])
        self.assertEqual(len(drv.emitted), 2)

    def test_libvirt_driver(self):
        from nova.virt.libvirt import driver as libvirt_driver
        self.assertTrue(issubclass(ax_adopt.LibvirtAdoptDriver,
                                   libvirt_driver.LibvirtDriver))
        self.assertIs(ax_adopt.LibvirtAdoptDriver.rebuild,
                      ax_adopt.AdoptMixin.rebuild)


if __name__ == '__main__':
    unittest.main()
