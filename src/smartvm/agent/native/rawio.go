// Non-blocking I/O through the netpoller with raw system calls. syscall.Read/Write/Syscall mark the
// goroutine's P as "in a system call"; under TCG even a short call can outlast two sysmon ticks,
// so sysmon takes the P away and hands it to another thread (futex wake-ups), and then polls every
// 20 us instead of backing off to 10 ms: milliseconds of a 1-vCPU guest per request. These calls
// never block (the fds are non-blocking; waiting is the netpoller's), so RawSyscall is safe.
package main

import (
	"os"
	"syscall"
	"unsafe"
)

// rawFile is a non-blocking fd registered with the netpoller.
type rawFile struct {
	f  *os.File
	rc syscall.RawConn
}

func newRawFile(fd int, name string) (*rawFile, error) {
	// F_SETFL can only change the status flags, and none but O_NONBLOCK is set on our fds: one call
	if _, _, e := syscall.RawSyscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_SETFL, syscall.O_NONBLOCK); e != 0 {
		return nil, e
	}
	f := os.NewFile(uintptr(fd), name)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &rawFile{f, rc}, nil
}

// Read reads what is there, waiting for data; 0 bytes and nil is EOF.
func (r *rawFile) Read(buf []byte) (int, error) {
	var n uintptr
	var e syscall.Errno
	err := r.rc.Read(func(fd uintptr) bool {
		for {
			n, _, e = syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
			if e != syscall.EINTR {
				return e != syscall.EAGAIN
			}
		}
	})
	if err != nil {
		return 0, err
	}
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// WriteParts writes every part, waiting for room.
func (r *rawFile) WriteParts(parts [][]byte) error {
	var werr error
	err := r.rc.Write(func(fd uintptr) bool {
		werr = writeSome(int(fd), &parts)
		return werr != syscall.EAGAIN
	})
	if err != nil {
		return err
	}
	return werr
}

func (r *rawFile) Close() error { return r.f.Close() }

// rawClose closes an fd that is not the netpoller's (a pipe end after the spawn): close(2) of a
// pipe never blocks, and the P stays with this goroutine.
func rawClose(fd int) { syscall.RawSyscall(syscall.SYS_CLOSE, uintptr(fd), 0, 0) }

// rawStat is stat(2) of a local path without giving up the P (see the top of this file).
func rawStat(path string, st *syscall.Stat_t) error {
	p, err := syscall.BytePtrFromString(path)
	if err != nil {
		return err
	}
	if _, _, e := syscall.RawSyscall6(syscall.SYS_NEWFSTATAT, uintptr(atFdCwd), uintptr(unsafe.Pointer(p)),
		uintptr(unsafe.Pointer(st)), 0, 0, 0); e != 0 {
		return e
	}
	return nil
}

// rawAccess is access(path, mode) without giving up the P.
func rawAccess(path string, mode uint32) error {
	p, err := syscall.BytePtrFromString(path)
	if err != nil {
		return err
	}
	if _, _, e := syscall.RawSyscall6(syscall.SYS_FACCESSAT, uintptr(atFdCwd), uintptr(unsafe.Pointer(p)),
		uintptr(mode), 0, 0, 0); e != 0 {
		return e
	}
	return nil
}

var atFdCwd = -100 // AT_FDCWD (a variable: a negative constant does not convert to uintptr)
