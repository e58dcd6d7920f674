// Transports: the virtio-serial ports of the QEMU engine (non-blocking, read with readv into many
// page buffers, written with writev, the first write of a session blocking until a host connects,
// as guest.py's _PortReader/_port_writer), plus a Unix socket listener and stdio for host tests.
package main

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const portPages = 64

type pollFd struct {
	fd      int32
	events  int16
	revents int16
}

const (
	pollIn  = 0x1
	pollOut = 0x4
	pollHup = 0x10
)

func poll(fd int, events int16) (int16, error) {
	for {
		p := pollFd{fd: int32(fd), events: events}
		_, _, e := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&p)), 1, 0, 0, 0, 0)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return p.revents, nil
	}
}

func iovecs(parts [][]byte) []syscall.Iovec {
	iov := make([]syscall.Iovec, 0, len(parts))
	for _, b := range parts {
		if len(b) > 0 {
			v := syscall.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			iov = append(iov, v)
		}
	}
	return iov
}

// writeAll writes every part with writev; on EAGAIN it calls wait.
func writeAll(fd int, parts [][]byte, wait func() error) error {
	for len(parts) > 0 {
		iov := iovecs(parts)
		if len(iov) == 0 {
			return nil
		}
		n, _, e := syscall.Syscall(syscall.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
		if e == syscall.EINTR {
			continue
		}
		if e == syscall.EAGAIN {
			if wait == nil {
				return e
			}
			if err := wait(); err != nil {
				return err
			}
			continue
		}
		if e != 0 {
			return e
		}
		written := int(n)
		for written > 0 && len(parts) > 0 {
			if written >= len(parts[0]) {
				written -= len(parts[0])
				parts = parts[1:]
			} else {
				parts[0] = parts[0][written:]
				written = 0
			}
		}
		for len(parts) > 0 && len(parts[0]) == 0 {
			parts = parts[1:]
		}
	}
	return nil
}

// portSession is one session on a virtio-serial port.
type portSession struct {
	fd    int
	buf   []byte
	iov   []syscall.Iovec
	first bool
}

func newPortSession(fd int, buf []byte) *portSession {
	s := &portSession{fd: fd, buf: buf, first: true}
	for i := 0; i < portPages; i++ {
		v := syscall.Iovec{Base: &buf[i*4096]}
		v.SetLen(4096)
		s.iov = append(s.iov, v)
	}
	return s
}

func (s *portSession) Name() string { return "virtio-serial" }

func (s *portSession) Read() ([]byte, error) {
	for {
		n, _, e := syscall.Syscall(syscall.SYS_READV, uintptr(s.fd), uintptr(unsafe.Pointer(&s.iov[0])), uintptr(len(s.iov)))
		switch e {
		case 0:
			return s.buf[:n], nil
		case syscall.EAGAIN:
			if _, err := poll(s.fd, pollIn); err != nil {
				return nil, err
			}
		case syscall.EINTR:
		default:
			return nil, e
		}
	}
}

func (s *portSession) Write(parts [][]byte) error {
	if s.first { // the hello: blocking, so it waits for a host to connect
		s.first = false
		if err := syscall.SetNonblock(s.fd, false); err != nil {
			return err
		}
		err := writeAll(s.fd, parts, nil)
		syscall.SetNonblock(s.fd, true)
		return err
	}
	return writeAll(s.fd, parts, func() error {
		ev, err := poll(s.fd, pollOut)
		if err != nil {
			return err
		}
		if ev&pollHup != 0 {
			return errors.New("the host closed the virtio-serial port")
		}
		return nil
	})
}

// serveVirtio serves one port forever, one session after another.
func (a *Agent) serveVirtio(dev string) {
	for {
		fd, err := syscall.Open(dev, syscall.O_RDWR|syscall.O_CLOEXEC|syscall.O_NONBLOCK, 0)
		if err != nil {
			logf("virtio-serial port %s failed: %v; retrying", dev, err)
			time.Sleep(500 * time.Millisecond)
			continue
		}
		var wlock sync.Mutex
		buf := make([]byte, portPages*4096)
		backoff := 50 * time.Millisecond
		for {
			c := newConn(a, newPortSession(fd, buf), &wlock)
			t0 := time.Now()
			got := a.serve(c)
			if got == 0 && time.Since(t0) < 500*time.Millisecond {
				time.Sleep(backoff) // host not really there: do not spin
				backoff *= 2
				if backoff > time.Second {
					backoff = time.Second
				}
			} else {
				backoff = 50 * time.Millisecond
			}
		}
	}
}

// findVirtioPorts maps port names (name, name.N) to their /dev nodes.
func findVirtioPorts(name string) map[string]string {
	found := map[string]string{}
	const sysfs = "/sys/class/virtio-ports"
	entries, err := os.ReadDir(sysfs)
	if err != nil {
		return found
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	for _, port := range names {
		data, err := os.ReadFile(filepath.Join(sysfs, port, "name"))
		if err != nil {
			continue
		}
		got := strings.TrimSpace(string(data))
		suffix := ""
		if strings.HasPrefix(got, name+".") {
			suffix = got[len(name)+1:]
		}
		if _, err := strconv.Atoi(suffix); got == name || (suffix != "" && err == nil && !strings.ContainsAny(suffix, "+-")) {
			found[got] = "/dev/" + port
		}
	}
	return found
}

// streamConn is a socket or stdio transport.
type streamConn struct {
	r    interface{ Read([]byte) (int, error) }
	w    func([][]byte) error
	name string
	buf  []byte
}

func (s *streamConn) Name() string { return s.name }

func (s *streamConn) Read() ([]byte, error) {
	n, err := s.r.Read(s.buf)
	if n > 0 {
		return s.buf[:n], nil
	}
	if err != nil && !errors.Is(err, os.ErrClosed) {
		return nil, nil // EOF or a reset: the session is over
	}
	return nil, err
}

func (s *streamConn) Write(parts [][]byte) error { return s.w(parts) }

func (a *Agent) serveUnix(path string) error {
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			logf("accept failed: %v", err)
			time.Sleep(500 * time.Millisecond)
			continue
		}
		go func(conn net.Conn) {
			defer conn.Close()
			t := &streamConn{r: conn, name: "unix", buf: make([]byte, chunkSize), w: func(parts [][]byte) error {
				bufs := net.Buffers(append([][]byte(nil), parts...))
				_, err := bufs.WriteTo(conn)
				return err
			}}
			a.serve(newConn(a, t, &sync.Mutex{}))
		}(conn)
	}
}

func (a *Agent) serveStdio() {
	t := &streamConn{r: os.Stdin, name: "stdio", buf: make([]byte, chunkSize), w: func(parts [][]byte) error {
		return writeAll(1, parts, nil)
	}}
	a.serve(newConn(a, t, &sync.Mutex{}))
}
