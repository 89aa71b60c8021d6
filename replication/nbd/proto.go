package nbd

import "strconv"

// Wire constants, from the NBD protocol description
// (github.com/NetworkBlockDevice/nbd, doc/proto.md). All integers on the wire
// are big-endian.
const (
	magicNBD      = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt      = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply = 0x0003e889045565a9
	magicRequest  = 0x25609513
	magicReply    = 0x67446698

	// Handshake flags (server) and client flags.
	flagFixedNewstyle   = 1 << 0
	flagNoZeroes        = 1 << 1
	flagCFixedNewstyle  = 1 << 0
	flagCNoZeroes       = 1 << 1
	knownClientFlags    = flagCFixedNewstyle | flagCNoZeroes
	serverHandshakeFlag = flagFixedNewstyle | flagNoZeroes

	// Transmission flags.
	tflagHasFlags        = 1 << 0
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8

	// Options.
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8

	// Option replies.
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repErrUnsup    = 1<<31 + 1
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	infoExport     = 0
	infoBlockSize  = 3
	exportNameZero = 124 // zero bytes after an NBD_OPT_EXPORT_NAME reply

	// Commands and command flags.
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdFlagFUA     = 1 << 0
	cmdFlagNoHole  = 1 << 1

	// Error values of a simple reply.
	errnoEIO     = 5
	errnoEINVAL  = 22
	errnoENOSPC  = 28
	errnoENOTSUP = 95

	optionHeaderSize  = 16
	requestHeaderSize = 28
	replyHeaderSize   = 16
)

// Limits the server enforces on a client.
const (
	// MaxPayload is the largest READ or WRITE the server accepts, advertised
	// as the maximum block size. It is QEMU's own NBD buffer limit.
	MaxPayload = 1 << maxPayloadShift // 32 MiB
	// PreferredBlockSize is the advertised preferred block size.
	PreferredBlockSize = 4096

	maxPayloadShift = 25

	// maxOptionLen bounds one option's data: a 4096-byte export name (the
	// protocol's string limit) plus the NBD_OPT_GO framing and info requests.
	maxOptionLen = 8 << 10
	// maxOptions bounds the options a client may send before transmission.
	maxOptions = 32
	// queueDepth is how many parsed requests wait for the backend while the
	// next one is read; with MaxPayload writes it bounds a connection's
	// buffered payload to (queueDepth+2)*MaxPayload.
	queueDepth = 4
	// asyncDepth is how many started writes of an AsyncBackend may wait
	// for their replies.
	asyncDepth = 64
)

var optionNames = map[uint32]string{
	optExportName:      "NBD_OPT_EXPORT_NAME",
	optAbort:           "NBD_OPT_ABORT",
	optList:            "NBD_OPT_LIST",
	4:                  "NBD_OPT_PEEK_EXPORT",
	optStartTLS:        "NBD_OPT_STARTTLS",
	optInfo:            "NBD_OPT_INFO",
	optGo:              "NBD_OPT_GO",
	optStructuredReply: "NBD_OPT_STRUCTURED_REPLY",
	9:                  "NBD_OPT_LIST_META_CONTEXT",
	10:                 "NBD_OPT_SET_META_CONTEXT",
	11:                 "NBD_OPT_EXTENDED_HEADERS",
}

func optionName(o uint32) string {
	if n, ok := optionNames[o]; ok {
		return n
	}
	return "option " + strconv.FormatUint(uint64(o), 10)
}

var commandNames = [...]string{
	cmdRead:        "NBD_CMD_READ",
	cmdWrite:       "NBD_CMD_WRITE",
	cmdDisc:        "NBD_CMD_DISC",
	cmdFlush:       "NBD_CMD_FLUSH",
	cmdTrim:        "NBD_CMD_TRIM",
	5:              "NBD_CMD_CACHE",
	cmdWriteZeroes: "NBD_CMD_WRITE_ZEROES",
	7:              "NBD_CMD_BLOCK_STATUS",
	8:              "NBD_CMD_RESIZE",
}

func commandName(t uint16) string {
	if int(t) < len(commandNames) {
		return commandNames[t]
	}
	return "command " + strconv.FormatUint(uint64(t), 10)
}
