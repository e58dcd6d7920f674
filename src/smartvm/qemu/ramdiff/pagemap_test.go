package main

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// A private mapping of a file, as QEMU's guest RAM over a template's memory: the pages written are
// the changed ones; pages only read, and pages never touched, are the file's.
func TestChangedPagesAreTheWrittenOnes(t *testing.T) {
	const pages = 16
	path := filepath.Join(t.TempDir(), "memory")
	content := make([]byte, pages*pageSize)
	for i := range content {
		content[i] = byte(i / pageSize)
	}
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	file, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	rw, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	guest, err := syscall.Mmap(int(rw.Fd()), 0, len(content), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(guest)
	sum := 0
	for p := 0; p < 8; p++ {
		sum += int(guest[p*pageSize]) // read: still the file's pages
	}
	written := map[int]bool{2: true, 5: true, 9: true}
	for p := range written {
		guest[p*pageSize+7] = 0xff
	}
	changed, err := changedPages(os.Getpid(), file, len(content))
	if err != nil {
		t.Fatal(err)
	}
	for p, c := range changed {
		if c != written[p] {
			t.Errorf("page %d: changed=%v, written=%v", p, c, written[p])
		}
	}
	if _, err := changedPages(os.Getpid(), file, 2*len(content)); err == nil {
		t.Error("a mapping shorter than the base was accepted")
	}
	_ = sum
}
