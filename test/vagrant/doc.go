// Package vagrant stages and tests the Vagrant multi-host lab (the
// top-level Vagrantfile): four machines on vagrant-libvirt, AX installed in
// them from the project's .deb, an FT guest failing over from ax-a to ax-b.
package vagrant
