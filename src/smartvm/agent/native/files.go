// Native file ops: file_read (a download is the bulk path a relay slows down most). Same checks,
// events, chunks, errors (errno names, "not_found" for ENOENT) and result as guest.py's
// op_file_read, _path, _anchored and _os_error.
package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// startDir anchors relative request paths when the Python part works in its home (guest mode):
// guest.py then resolves them against the directory it started in, which is ours.
var startDir string

const eFile, eNotFound = "file_error", "not_found"

var errnoNames = map[syscall.Errno]string{
	syscall.EPERM: "EPERM", syscall.ENOENT: "ENOENT", syscall.EIO: "EIO", syscall.ENXIO: "ENXIO",
	syscall.EBADF: "EBADF", syscall.EAGAIN: "EAGAIN", syscall.ENOMEM: "ENOMEM", syscall.EACCES: "EACCES",
	syscall.EFAULT: "EFAULT", syscall.EBUSY: "EBUSY", syscall.EEXIST: "EEXIST", syscall.EXDEV: "EXDEV",
	syscall.ENODEV: "ENODEV", syscall.ENOTDIR: "ENOTDIR", syscall.EISDIR: "EISDIR", syscall.EINVAL: "EINVAL",
	syscall.ENFILE: "ENFILE", syscall.EMFILE: "EMFILE", syscall.ETXTBSY: "ETXTBSY", syscall.EFBIG: "EFBIG",
	syscall.ENOSPC: "ENOSPC", syscall.ESPIPE: "ESPIPE", syscall.EROFS: "EROFS", syscall.EMLINK: "EMLINK",
	syscall.ENAMETOOLONG: "ENAMETOOLONG", syscall.ELOOP: "ELOOP", syscall.ENOTEMPTY: "ENOTEMPTY",
	syscall.EOVERFLOW: "EOVERFLOW", syscall.EDQUOT: "EDQUOT", syscall.ESTALE: "ESTALE",
}

// fileError is guest.py's _os_error: "<what>: <strerror> (<ENAME>)", with the errno name attached.
type fileError struct {
	code, message, errno string
}

func (e *fileError) Error() string { return e.message }

func osError(err error, what string) *fileError {
	errno, ok := err.(syscall.Errno)
	if pe, isPath := err.(*os.PathError); isPath {
		errno, ok = pe.Err.(syscall.Errno)
	}
	name, known := errnoNames[errno]
	if !ok || !known {
		name = "EIO"
	}
	code := eFile
	if errno == syscall.ENOENT {
		code = eNotFound
	}
	return &fileError{code, fmt.Sprintf("%s: %s (%s)", what, strerror(errno), name), name}
}

// requestPath is guest.py's _path: a non-empty string without NUL, anchored.
func requestPath(req map[string]any, field string) (string, error) {
	v, ok := req[field].(string)
	if !ok || v == "" || strings.ContainsRune(v, 0) {
		return "", badRequest("%s must be a non-empty path string", field)
	}
	if startDir == "" || strings.HasPrefix(v, "/") {
		return v, nil
	}
	if strings.HasSuffix(startDir, "/") { // os.path.join, which does not clean the path
		return startDir + v, nil
	}
	return startDir + "/" + v, nil
}

// intField is a JSON integer (or a bool, an int to Python); ok false for anything else.
func intField(v any) (int64, bool) {
	switch x := v.(type) {
	case bool:
		if x {
			return 1, true
		}
		return 0, true
	case interface{ Int64() (int64, error) }:
		n, err := x.Int64()
		return n, err == nil
	}
	return 0, false
}

func (a *Agent) opFileRead(ch *Channel, req map[string]any, payload []byte) error {
	path, err := requestPath(req, "path")
	if err != nil {
		return err
	}
	offset := int64(0)
	okOffset := true
	if v, present := req["offset"]; present {
		offset, okOffset = intField(v)
	}
	length := int64(-1)
	okLength := true
	if v, present := req["length"]; present && v != nil {
		length, okLength = intField(v)
		if length < 0 {
			okLength = false
		}
	}
	if !okOffset || offset < 0 || !okLength {
		return badRequest("offset/length must be non-negative integers")
	}
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return osError(err, path)
	}
	defer syscall.Close(fd)
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return osError(err, path)
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		return &fileError{eFile, path + ": is a directory (EISDIR)", "EISDIR"}
	}
	ch.sendNow(outFrame{fEvent, map[string]any{"event": "open", "size": st.Size, "mode": st.Mode & 0o7777}, nil})
	if offset > 0 {
		if _, err := syscall.Seek(fd, offset, 0); err != nil {
			return osError(err, path)
		}
	}
	buf := getBuffer()
	defer putBuffer(buf)
	sent := int64(0)
	remaining := length
	for !ch.isCancelled() {
		want := int64(len(buf))
		if remaining >= 0 && remaining < want {
			want = remaining
		}
		if want == 0 {
			break
		}
		n, err := syscall.Read(fd, buf[:want])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return osError(err, path)
		}
		if n == 0 {
			break
		}
		ch.conn.send(fData, ch.id, map[string]any{"s": "file"}, buf[:n])
		sent += int64(n)
		if remaining >= 0 {
			remaining -= int64(n)
		}
	}
	ch.result(map[string]any{"path": path, "size": sent})
	return nil
}
