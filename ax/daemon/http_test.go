package daemon

import (
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

func TestLimitListenerCapsIdleConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }),
		ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(limitListener(ln, 4))
	defer srv.Close()
	// Four idle clients take every slot ...
	var idle []net.Conn
	for range 4 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	// ... a fifth is closed at once instead of waiting ...
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || n != 0 {
		t.Errorf("fifth connection got %d bytes, %v; want it closed", n, err)
	}
	c.Close()
	// ... and once the idle ones go, scrapes are served again.
	for _, c := range idle {
		c.Close()
	}
	var resp *http.Response
	for i := 0; i < 100; i++ {
		if resp, err = http.Get("http://" + ln.Addr().String() + "/metrics"); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("status %d", resp.StatusCode)
	}
}
