package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwapped = 1 << 62
	pmFile    = 1 << 61 // a page of the file (or shared anonymous memory), not a private copy
)

// changedPages tells, for each page of base as process pid maps it privately, whether the process
// may hold its own copy (written, or swapped out) rather than the file's page. A page it never
// wrote is still the file's (mapped, or not mapped at all and read from the file when touched), so
// the comparison with the base can be skipped for it, and the base page never read.
func changedPages(pid int, base *os.File, size int) ([]bool, error) {
	st, err := base.Stat()
	if err != nil {
		return nil, err
	}
	sys := st.Sys().(*syscall.Stat_t)
	start, err := mappingOf(pid, uint64(sys.Dev), sys.Ino, size)
	if err != nil {
		return nil, err
	}
	pagemap, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return nil, err
	}
	defer pagemap.Close()
	pages := size / pageSize
	raw := make([]byte, pages*8)
	if _, err := pagemap.ReadAt(raw, int64(start/pageSize)*8); err != nil {
		return nil, fmt.Errorf("reading the pagemap of process %d: %w", pid, err)
	}
	changed := make([]bool, pages)
	for i := range changed {
		entry := binary.LittleEndian.Uint64(raw[i*8:])
		changed[i] = entry&pmSwapped != 0 || (entry&pmPresent != 0 && entry&pmFile == 0)
	}
	return changed, nil
}

// mappingOf finds where process pid maps the whole file (device dev, inode ino) from offset 0.
func mappingOf(pid int, dev, ino uint64, size int) (uint64, error) {
	maps, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return 0, err
	}
	defer maps.Close()
	want := fmt.Sprintf("%02x:%02x", devMajor(dev), devMinor(dev))
	lines := bufio.NewScanner(maps)
	lines.Buffer(make([]byte, 64<<10), 1<<20)
	for lines.Scan() {
		// start-end perms offset dev inode path
		fields := strings.Fields(lines.Text())
		if len(fields) < 6 || fields[4] != strconv.FormatUint(ino, 10) || fields[3] != want {
			continue
		}
		if off, err := strconv.ParseUint(fields[2], 16, 64); err != nil || off != 0 {
			continue
		}
		bounds := strings.SplitN(fields[0], "-", 2)
		start, err1 := strconv.ParseUint(bounds[0], 16, 64)
		end, err2 := strconv.ParseUint(bounds[1], 16, 64)
		if err1 == nil && err2 == nil && end-start >= uint64(size) {
			return start, nil
		}
	}
	if err := lines.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("process %d does not map the base file (inode %d on %s) whole", pid, ino, want)
}

// Linux's dev_t encoding (glibc's gnu_dev_major/minor).
func devMajor(dev uint64) uint64 { return (dev>>8)&0xfff | (dev>>32)&^0xfff }
func devMinor(dev uint64) uint64 { return dev&0xff | (dev>>12)&^0xff }
