package netbuffer

// SetNoAnchor makes gates attached from now on go without the dispatcher
// anchor, as they do where it cannot be set up.
func SetNoAnchor(v bool) { noAnchor = v }

// The pinned format, for tests that corrupt it.
var PinNames = pinNames

const (
	PinMeta      = pinMeta
	PinDrops     = pinDrops
	MetaSlots    = metaSlots
	MetaSlotVer  = metaFormat
	MetaSlotMark = metaMark
)
