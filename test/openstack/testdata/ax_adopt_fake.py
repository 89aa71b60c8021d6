# Nova's fake compute driver with AX's adopting mixin over it, for
# TestOpenStackEvacuate: nova.virt.ax_adopt_fake.AdoptingFakeDriver. The
# test runs nova-compute through a wrapper that adds the directory of this
# file and ax_adopt.py to nova.virt's path.
from oslo_log import log as logging

from nova.compute import power_state
from nova.virt import ax_adopt
from nova.virt import fake

LOG = logging.getLogger(__name__)


class AdoptingFakeDriver(ax_adopt.AdoptMixin, fake.FakeDriver):

    def ax_adopt(self, context, instance, network_info):
        # The fake's "hypervisor" is this dict: the adopted domain runs.
        self.instances[instance.uuid] = fake.FakeInstance(
            instance.name, power_state.RUNNING, instance.uuid)

    def spawn(self, context, instance, *args, **kwargs):
        LOG.info('AX test: spawn of instance %s', instance.uuid)
        return super(AdoptingFakeDriver, self).spawn(
            context, instance, *args, **kwargs)
