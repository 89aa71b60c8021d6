# Unit tests of the adopting mixin, without a running Nova:
#   /usr/bin/python3 -m unittest test_ax_adopt   (in nova-hook/driver)
import os
import shutil
import tempfile
import unittest

from nova.compute import task_states
from nova import exception

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

    def test_libvirt_driver(self):
        from nova.virt.libvirt import driver as libvirt_driver
        self.assertTrue(issubclass(ax_adopt.LibvirtAdoptDriver,
                                   libvirt_driver.LibvirtDriver))
        self.assertIs(ax_adopt.LibvirtAdoptDriver.rebuild,
                      ax_adopt.AdoptMixin.rebuild)


if __name__ == '__main__':
    unittest.main()
