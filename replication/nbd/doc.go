// Package nbd is the NBD server a primary's QEMU mirrors a protected guest
// disk to (blockdev-mirror onto an nbd blockdev over a Unix socket); every
// request goes to a Backend that axd supplies.
//
// Handshake: fixed newstyle only (a client without NBD_FLAG_C_FIXED_NEWSTYLE,
// or with an unknown client flag, is closed). NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
// NBD_OPT_INFO, NBD_OPT_LIST and NBD_OPT_ABORT are served; every other option
// (STRUCTURED_REPLY, STARTTLS, SET_META_CONTEXT, …) is answered
// NBD_REP_ERR_UNSUP, so QEMU falls back to simple replies. NBD_OPT_GO/INFO
// always report the size, the transmission flags and block sizes min 1,
// preferred 4096, max 32 MiB. More than 32 options, an option over 8 KiB or
// 30 s without reaching transmission close the connection.
//
// Transmission: simple replies to READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and
// DISC. Requests are carried out one at a time in the order received, while
// the next one is already being read; a reply goes out only after the
// backend returned, so an acknowledged WRITE is in the backend. FUA reaches
// WriteAt and WriteZeroes; TRIM with FUA is followed by Flush. Zero-length
// requests succeed without a backend call.
//
// A request that breaks the protocol — bad magic, an unknown command or
// command flag, a READ or WRITE over 32 MiB, a range past the end of the
// export, a truncated header or payload — never reaches the backend: the
// requests before it are answered, then the connection is closed and
// ServeConn returns a one-line error wrapping ErrProtocol (or
// io.ErrUnexpectedEOF) that says what was wrong. A range past the end is
// treated so, not answered NBD_EINVAL: a client that disagrees about the size
// is writing to the wrong disk, and QEMU never sends one.
package nbd
