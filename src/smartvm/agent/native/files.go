// Native file ops: file_read and file_write (transfers are the bulk path a relay slows down most).
// Same checks, events, chunks, temporary file, modes and owners, errors (errno names, "not_found"
// for ENOENT) and results as guest.py's op_file_read, op_file_write, _path, _anchored, _owner,
// _makedirs and _os_error.
package main

import (
	"fmt"
	"os"
	"path/filepath"
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

// pyDirname and pyBasename are posixpath.dirname/basename.
func pyDirname(p string) string {
	i := strings.LastIndex(p, "/") + 1
	head := p[:i]
	if head != "" && strings.Trim(head, "/") != "" {
		head = strings.TrimRight(head, "/")
	}
	return head
}

func pyBasename(p string) string { return p[strings.LastIndex(p, "/")+1:] }

// requestOwner is guest.py's _owner: the (uid, gid) new files and directories get, or nil.
func requestOwner(req map[string]any, field string) (*[2]int, error) {
	who := req[field]
	if who == nil {
		return nil, nil
	}
	account, err := lookupUser(who)
	if err != nil {
		return nil, err
	}
	return &[2]int{account.uid, account.gid}, nil
}

// makedirs is guest.py's _makedirs (mkdir -p; new directories owned by owner).
func makedirs(path string, mode uint32, owner *[2]int, target bool) (bool, error) {
	cur := path
	if !strings.HasPrefix(cur, "/") {
		if wd, err := os.Getwd(); err == nil {
			cur = wd + "/" + cur
		}
	}
	cur = filepath.Clean(cur)
	var missing []string
	seen := map[string]bool{}
	for !isDir(cur) && !seen[cur] {
		missing = append(missing, cur)
		seen[cur] = true
		cur = filepath.Dir(cur)
	}
	created := false
	for i := len(missing) - 1; i >= 0; i-- {
		d := missing[i]
		if err := syscall.Mkdir(d, mode); err != nil {
			if err == syscall.EEXIST {
				if isDir(d) {
					continue
				}
				name := "ENOTDIR"
				if target && d == missing[0] {
					name = "EEXIST"
				}
				return false, &fileError{eFile, fmt.Sprintf("%s: exists and is not a directory (%s)", d, name), name}
			}
			return false, osError(err, d)
		}
		created = d == missing[0]
		if owner != nil {
			if err := syscall.Chown(d, owner[0], owner[1]); err != nil {
				return false, osError(err, d)
			}
		}
	}
	return created, nil
}

func (a *Agent) opFileWrite(ch *Channel, req map[string]any, payload []byte) error {
	path, err := requestPath(req, "path")
	if err != nil {
		return err
	}
	var mode int64 = -1
	if v, present := req["mode"]; present && v != nil {
		m, ok := intField(v)
		if !ok || m < 0 || m > 0o7777 {
			return badRequest("mode must be an integer permission like 0o644")
		}
		mode = m
	}
	owner, err := requestOwner(req, "owner")
	if err != nil {
		return err
	}
	if v, present := req["parents"]; !present || truthy(v) {
		if parent := pyDirname(path); parent != "" {
			if _, err := makedirs(parent, 0o755, owner, false); err != nil {
				return err
			}
		}
	}
	appendMode := truthy(req["append"])
	var st syscall.Stat_t
	exists := syscall.Stat(path, &st) == nil
	rawPath, _ := req["path"].(string) // guest.py names an open failure by the path as requested
	var fd int
	tmp := ""
	if appendMode {
		fd, err = syscall.Open(path, syscall.O_WRONLY|syscall.O_APPEND|syscall.O_CREAT|syscall.O_CLOEXEC, 0o644)
	} else {
		dir := pyDirname(path)
		if dir == "" {
			dir = "."
		}
		name := fmt.Sprintf(".%s.%d-%d.smartvm-part", pyBasename(path), os.Getpid(), ch.id)
		if strings.HasSuffix(dir, "/") {
			tmp = dir + name
		} else {
			tmp = dir + "/" + name
		}
		fd, err = syscall.Open(tmp, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_TRUNC|syscall.O_CLOEXEC, 0o600)
	}
	if err != nil { // raised outside guest.py's try: its generic handler drops the errno name
		fe := osError(err, rawPath)
		return &opError{fe.code, fe.message}
	}
	ok := false
	defer func() {
		if fd >= 0 {
			syscall.Close(fd)
		}
		if !ok && tmp != "" {
			syscall.Unlink(tmp)
		}
	}()
	size := 0
	chunk, eof := payload, truthy(req["eof"])
	for {
		for rest := chunk; len(rest) > 0; {
			n, err := syscall.Write(fd, rest)
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				return osError(err, path)
			}
			rest = rest[n:]
		}
		size += len(chunk)
		if eof {
			break
		}
		it, more := ch.nextData()
		if !more {
			return &opError{eCancelled, "request cancelled"}
		}
		chunk, eof = it.payload, truthy(it.header["eof"])
	}
	if mode >= 0 {
		err = syscall.Fchmod(fd, uint32(mode))
	} else if tmp != "" {
		perm := uint32(0o644)
		if exists {
			perm = st.Mode & 0o7777
		}
		err = syscall.Fchmod(fd, perm)
	}
	if err == nil && exists && tmp != "" && os.Getuid() == 0 {
		err = syscall.Fchown(fd, int(st.Uid), int(st.Gid))
	} else if err == nil && !exists && owner != nil {
		err = syscall.Fchown(fd, owner[0], owner[1])
	}
	if err == nil {
		err = syscall.Close(fd)
		fd = -1
	}
	if err == nil && tmp != "" {
		err = syscall.Rename(tmp, path)
	}
	if err != nil {
		return osError(err, path)
	}
	ok = true
	ch.result(map[string]any{"path": path, "size": size})
	return nil
}
