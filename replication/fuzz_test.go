package replication

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// fuzzSeeds are valid streams of every kind of frame plus a few broken ones;
// testdata/fuzz holds the same as a committed corpus.
func fuzzSeeds(t testing.TB) [][]byte {
	var h hello
	h.MinVersion, h.MaxVersion, h.VM = 2, 2, "vm-1"
	pages, _ := AppendPages(nil, testPages(2, 3))
	good := encode(t, Ack{Epoch: 3}.Frame())
	badCRC := bytes.Clone(good)
	badCRC[len(badCRC)-1] ^= 1
	return [][]byte{
		encode(t, h.frame(), challenge{}.frame(), response{}.frame(), welcome{Version: ProtocolVersion}.frame(), rejectFrame()),
		encode(t, Frame{Type: TypeSyncPages, Payload: pages}, SyncDone{RAMSize: 1 << 20, Pages: 2}.Frame()),
		encode(t, checkpointFrames(t, 7, testPages(2, 0), []byte("device state"), 0)...),
		encode(t, DiskWrite{Disk: 1, Offset: 4096, Data: []byte("sector")}.Frame(7), EpochBoundary{Epoch: 7}.Frame()),
		encode(t, Heartbeat{SentUnixNano: 1, LastCommitted: 6}.Frame(), Ack{Epoch: 7}.Frame()),
		encode(t, append([]Frame{acceptFrame(2, [][]uint64{{1}, {2, 3}})}, baseFrames([]uint64{4, 5}, [][]uint64{{6}, {7, 8}})...)...),
		good[:HeaderSize+2],
		badCRC,
		[]byte("GET / HTTP/1.1\r\n\r\n"),
	}
}

// decodeTyped runs the typed decoder that belongs to f's type.
func decodeTyped(f Frame) error {
	var err error
	switch f.Type {
	case TypeHello:
		_, err = decodeHello(f)
	case TypeChallenge:
		_, err = decodeChallenge(f)
	case TypeResponse:
		_, err = decodeResponse(f)
	case TypeWelcome:
		_, err = decodeWelcome(f)
	case TypeReject:
		err = decodeReject(f)
	case TypeSyncPages, TypeCheckpointPages:
		_, err = DecodePages(f)
	case TypeSyncDone:
		_, err = DecodeSyncDone(f)
	case TypeCheckpointBegin:
		_, err = DecodeCheckpointBegin(f)
	case TypeCheckpointEnd:
		_, err = DecodeCheckpointEnd(f)
	case TypeDiskWrite:
		_, err = DecodeDiskWrite(f)
	case TypeEpochBoundary:
		_, err = DecodeEpochBoundary(f)
	case TypeHeartbeat:
		_, err = DecodeHeartbeat(f)
	case TypeAck:
		_, err = DecodeAck(f)
	case TypeAccept:
		_, _, err = decodeAccept(f, fuzzRAM, fuzzDisks)
	case TypeBase:
		_, err = decodeBase(f, nil, fuzzRAM/PageSize)
	}
	return err
}

func FuzzReadFrame(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	const max = 64 << 10
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), max)
		a := NewCheckpointAssembler(1<<20, 0, 1<<20)
		var frames []Frame
		for {
			fr, err := r.ReadFrame()
			if err != nil {
				var fe *FrameError
				if err != io.EOF && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.As(err, &fe) {
					t.Fatalf("untyped error: %v", err)
				}
				break
			}
			if !fr.Type.Valid() || len(fr.Payload) > max {
				t.Fatalf("reader returned %s with %d bytes", fr.Type, len(fr.Payload))
			}
			if err := decodeTyped(fr); err != nil {
				var fe *FrameError
				if !errors.As(err, &fe) {
					t.Fatalf("%s decoder: untyped error: %v", fr.Type, err)
				}
			}
			if fr.Type.IsCheckpoint() {
				a.Add(fr)
			}
			fr.Payload = bytes.Clone(fr.Payload)
			frames = append(frames, fr)
		}
		// Whatever was accepted re-encodes to the same bytes.
		if len(frames) > 0 {
			again := encode(t, frames...)
			if !bytes.Equal(again, data[:len(again)]) {
				t.Fatal("accepted frames re-encode differently")
			}
		}
	})
}

func FuzzDecodePages(f *testing.F) {
	one, _ := AppendPages(nil, testPages(1, 0))
	two, _ := AppendPages(nil, testPages(2, 1<<40))
	f.Add(one)
	f.Add(two)
	f.Add([]byte{})
	f.Add([]byte{1, 0, 0, 0})
	f.Add(append([]byte{0xff, 0xff, 0xff, 0xff}, one[4:]...))
	f.Fuzz(func(t *testing.T, payload []byte) {
		pages, err := DecodePages(Frame{Type: TypeCheckpointPages, Payload: payload})
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		for _, p := range pages {
			if len(p.Data) != PageSize {
				t.Fatalf("page of %d bytes", len(p.Data))
			}
		}
		again, err := AppendPages(nil, pages)
		if err != nil || !bytes.Equal(again, payload) {
			t.Fatalf("decoded pages re-encode differently: %v", err)
		}
	})
}

// What the fuzzed primary knows of its VM: the base it takes is checked
// against these.
const fuzzRAM = 1 << 20

var fuzzDisks = []int64{1 << 20, 3*DiskBaseRange + 1}

// FuzzDecodeAccept feeds the primary Accept payloads: whatever passes has
// counts that fit the VM, and encodes back to the same bytes. Testdata/fuzz
// holds the seeds.
func FuzzDecodeAccept(f *testing.F) {
	f.Add(acceptFrame(fuzzRAM/PageSize, nil).Payload)
	f.Add(acceptFrame(0, [][]uint64{make([]uint64, 16), make([]uint64, 4)}).Payload)
	f.Add(acceptFrame(fuzzRAM/PageSize, [][]uint64{make([]uint64, 16), make([]uint64, 3)}).Payload)
	f.Add(le.AppendUint32(le.AppendUint64(nil, 0), 1<<31))
	f.Add(le.AppendUint64(nil, fuzzRAM/PageSize))
	f.Add(le.AppendUint64(le.AppendUint64(le.AppendUint32(le.AppendUint64(nil, 0), 2), 16), 1<<62))
	f.Fuzz(func(t *testing.T, payload []byte) {
		pages, ranges, err := decodeAccept(Frame{Type: TypeAccept, Payload: payload}, fuzzRAM, fuzzDisks)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if pages != 0 && pages != fuzzRAM/PageSize {
			t.Fatalf("accepted a base of %d pages", pages)
		}
		disks := make([][]uint64, len(ranges))
		for i, n := range ranges {
			if n != DiskRanges(fuzzDisks[i]) {
				t.Fatalf("accepted %d ranges for disk %d", n, i)
			}
			disks[i] = make([]uint64, n)
		}
		if again := acceptFrame(pages, disks).Payload; !bytes.Equal(again, payload) {
			t.Fatal("a decoded Accept encodes differently")
		}
	})
}

// sealedSeeds are record streams under testC2S: whole, cut, altered,
// replayed, with impossible lengths; testdata/fuzz holds the same.
func sealedSeeds(t testing.TB) [][]byte {
	recs := sealRecords(t, testC2S, []byte("spec"), bytes.Repeat([]byte{7}, 3000), []byte("bye"))
	all := bytes.Join(recs, nil)
	flipped := bytes.Clone(all)
	flipped[len(recs[0])+recordHeader+10] ^= 4
	zero := bytes.Clone(recs[0])
	le.PutUint32(zero, 0)
	huge := bytes.Clone(recs[0])
	le.PutUint32(huge, 1<<31)
	return [][]byte{
		all,
		all[:len(all)-5],
		flipped,
		append(bytes.Clone(all), recs[1]...),
		append(bytes.Clone(recs[0]), zero...),
		huge,
		encode(t, Frame{Type: TypeBye}),
		{},
	}
}

// FuzzSealedRecord feeds the record layer's reader what a relay on the
// network might send. It must return only plaintext that was sealed under
// the key — which the fuzzer cannot forge, so only prefixes of the seeds'
// records — and refuse the rest with a typed error that closes the
// connection.
func FuzzSealedRecord(f *testing.F) {
	for _, s := range sealedSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		in := &bufConn{r: bytes.NewReader(data)}
		c, err := newSealedConn(in, testC2S, testC2S)
		if err != nil {
			t.Fatal(err)
		}
		plain, err := io.ReadAll(c)
		switch {
		case err == nil, errors.Is(err, io.ErrUnexpectedEOF):
		case errors.Is(err, ErrRecord):
			if !in.closed {
				t.Fatal("a refused record left the connection open")
			}
		default:
			t.Fatalf("untyped error: %v", err)
		}
		// What opened re-seals, record by record, to the bytes it came from.
		var chunks [][]byte
		off, used := 0, 0
		for range c.rseq {
			n := int(le.Uint32(data[off:])) - recordTag
			chunks = append(chunks, plain[used:used+n])
			used += n
			off += recordHeader + n + recordTag
		}
		if used != len(plain) {
			t.Fatalf("%d bytes of plaintext from %d records of %d bytes", len(plain), c.rseq, used)
		}
		if again := bytes.Join(sealRecords(t, testC2S, chunks...), nil); !bytes.Equal(again, data[:off]) {
			t.Fatal("accepted records re-seal differently")
		}
	})
}
