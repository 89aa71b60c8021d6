package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
)

const testSize = 1 << 20

const wantTFlags = tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes

func TestHandshake(t *testing.T) {
	tests := []struct {
		name string
		// run drives the client; the server's export "disk" is a recorder
		// of testSize bytes and "other" a MemBackend.
		run      func(t *testing.T, c *testClient)
		wantErr  string // substring of ServeConn's error; "" for nil
		wantIs   error
		rejected uint64
	}{
		{
			name: "export name",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle | flagCNoZeroes)
				c.option(optExportName, []byte("disk"))
				r := c.read(10)
				if size, tf := binary.BigEndian.Uint64(r), binary.BigEndian.Uint16(r[8:]); size != testSize || tf != wantTFlags {
					t.Errorf("size %d flags %#x, want %d %#x", size, tf, testSize, wantTFlags)
				}
				c.disconnect()
			},
		},
		{
			name: "export name with zeroes",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				c.option(optExportName, []byte("disk"))
				r := c.read(10 + 124)
				if !bytes.Equal(r[10:], make([]byte, 124)) {
					t.Errorf("reserved bytes not zero")
				}
				if got, _ := c.do(cmdFlush, 0, 0, 0, nil); got != 0 {
					t.Errorf("flush after zeroes: error %d", got)
				}
				c.disconnect()
			},
		},
		{
			name: "go",
			run: func(t *testing.T, c *testClient) {
				info := c.connect("disk")
				want := exportInfo{size: testSize, tflags: wantTFlags, minBS: 1, prefBS: 4096, maxBS: 32 << 20}
				if info != want {
					t.Errorf("info %+v, want %+v", info, want)
				}
				if got, _ := c.do(cmdFlush, 0, 0, 0, nil); got != 0 {
					t.Errorf("flush: error %d", got)
				}
				c.disconnect()
			},
		},
		{
			name: "go without info requests",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle | flagCNoZeroes)
				c.option(optGo, infoData("disk"))
				if info := c.readInfo(optGo); info.size != testSize {
					t.Errorf("size %d", info.size)
				}
				c.disconnect()
			},
		},
		{
			name: "info then go",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle | flagCNoZeroes)
				c.option(optInfo, infoData("other", infoBlockSize, 1, 2))
				info := c.readInfo(optInfo)
				if info.size != 4096 || info.tflags != wantTFlags|tflagCanMultiConn {
					t.Errorf("info %+v: want size 4096 and CAN_MULTI_CONN for a MemBackend", info)
				}
				c.option(optGo, infoData("disk", infoBlockSize))
				if info := c.readInfo(optGo); info.size != testSize || info.tflags != wantTFlags {
					t.Errorf("go %+v", info)
				}
				c.disconnect()
			},
		},
		{
			name: "list then abort",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				c.option(optList, nil)
				var names []string
				for r := c.optReply(); r.typ != repAck; r = c.optReply() {
					if r.typ != repServer || binary.BigEndian.Uint32(r.data) != uint32(len(r.data)-4) {
						t.Fatalf("reply %+v", r)
					}
					names = append(names, string(r.data[4:]))
				}
				if strings.Join(names, ",") != "disk,other" {
					t.Errorf("exports %q", names)
				}
				c.option(optAbort, nil)
				if r := c.optReply(); r.opt != optAbort || r.typ != repAck {
					t.Errorf("abort reply %+v", r)
				}
			},
		},
		{
			name: "unsupported options then go",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle | flagCNoZeroes)
				for _, opt := range []uint32{optStructuredReply, optStartTLS, 9, 10, 11, 4, 0x7fff} {
					c.option(opt, []byte("some data"))
					if r := c.optReply(); r.opt != opt || r.typ != repErrUnsup {
						t.Errorf("option %d: reply %+v, want NBD_REP_ERR_UNSUP", opt, r)
					}
				}
				c.option(optGo, infoData("disk"))
				c.readInfo(optGo)
				c.disconnect()
			},
		},
		{
			name: "go unknown export then abort",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				for _, opt := range []uint32{optGo, optInfo} {
					c.option(opt, infoData("nope"))
					if r := c.optReply(); r.typ != repErrUnknown || !strings.Contains(string(r.data), `"nope"`) {
						t.Errorf("reply %+v, want NBD_REP_ERR_UNKNOWN naming the export", r)
					}
				}
				c.option(optAbort, nil)
				c.optReply()
			},
		},
		{
			name: "malformed go and list are invalid",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				for _, d := range [][]byte{nil, {0, 0, 0, 9, 'd'}, append(infoData("disk"), 0)} {
					c.option(optGo, d)
					if r := c.optReply(); r.typ != repErrInvalid {
						t.Errorf("go %x: reply %+v, want NBD_REP_ERR_INVALID", d, r)
					}
				}
				c.option(optList, []byte("x"))
				if r := c.optReply(); r.typ != repErrInvalid {
					t.Errorf("list with data: reply %+v", r)
				}
				c.option(optAbort, nil)
				c.optReply()
			},
		},
		{
			name: "client leaves between options",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				c.nc.Close()
			},
		},
		{
			name: "export name unknown",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				c.option(optExportName, []byte("nope"))
			},
			wantErr: `NBD_OPT_EXPORT_NAME: unknown export "nope"`, wantIs: ErrUnknownExport, rejected: 1,
		},
		{
			name:    "unknown client flags",
			run:     func(t *testing.T, c *testClient) { c.greet(flagCFixedNewstyle | 1<<5) },
			wantErr: "unknown client flags 0x20", wantIs: ErrProtocol, rejected: 1,
		},
		{
			name:    "not fixed newstyle",
			run:     func(t *testing.T, c *testClient) { c.greet(0) },
			wantErr: "fixed newstyle", wantIs: ErrProtocol, rejected: 1,
		},
		{
			name: "option too long",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				c.mustWrite(optionMsg(optGo, nil)[:12])
				c.mustWrite(binary.BigEndian.AppendUint32(nil, 1<<20))
			},
			wantErr: "NBD_OPT_GO carries 1048576 bytes, over the 8192-byte limit", wantIs: ErrProtocol, rejected: 1,
		},
		{
			name: "too many options",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				for range maxOptions {
					c.option(optStructuredReply, nil)
					c.optReply()
				}
				c.option(optStructuredReply, nil)
			},
			wantErr: "more than 32 options", wantIs: ErrProtocol, rejected: 1,
		},
		{
			name: "bad option magic",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				c.mustWrite(make([]byte, 16))
			},
			wantErr: "bad option magic 0x0", wantIs: ErrProtocol, rejected: 1,
		},
		{
			name: "truncated option data",
			run: func(t *testing.T, c *testClient) {
				c.greet(flagCFixedNewstyle)
				c.mustWrite(optionMsg(optGo, infoData("disk"))[:20])
				c.nc.Close()
			},
			wantErr: "read NBD_OPT_GO data (10 bytes): unexpected EOF", wantIs: io.ErrUnexpectedEOF, rejected: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, rec := newTestServer(t, testSize)
			if err := srv.AddExport("other", NewMemBackend(4096)); err != nil {
				t.Fatal(err)
			}
			c, done := pipe(t, srv)
			tt.run(t, c)
			err := result(t, done)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("ServeConn: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("ServeConn error %v, want one containing %q", err, tt.wantErr)
			case tt.wantIs != nil && !errors.Is(err, tt.wantIs):
				t.Fatalf("ServeConn error %v does not wrap %v", err, tt.wantIs)
			}
			if tt.wantErr != "" && !c.closed() {
				t.Error("connection left open after a rejected handshake")
			}
			if got := srv.Stats().Rejected; got != tt.rejected {
				t.Errorf("Rejected = %d, want %d", got, tt.rejected)
			}
			if calls := rec.Calls(); tt.wantErr != "" && len(calls) > 0 {
				t.Errorf("backend called: %v", calls)
			}
		})
	}
}

func TestParseInfoRequest(t *testing.T) {
	tests := []struct {
		data   []byte
		name   string
		wantOK bool
	}{
		{infoData("disk"), "disk", true},
		{infoData("", 3), "", true},
		{infoData("a", 0, 1, 2, 3), "a", true},
		{nil, "", false},
		{[]byte{0, 0, 0, 0, 0}, "", false},
		{[]byte{0xff, 0xff, 0xff, 0xff, 0, 0}, "", false},
		{infoData("disk", 3)[:11], "", false},
		{append(infoData("disk", 3), 0), "", false},
	}
	for _, tt := range tests {
		name, ok := parseInfoRequest(tt.data)
		if ok != tt.wantOK || name != tt.name {
			t.Errorf("parseInfoRequest(%x) = %q, %v; want %q, %v", tt.data, name, ok, tt.name, tt.wantOK)
		}
	}
}
