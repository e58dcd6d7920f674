// Command ramdiff copies a QEMU migration stream from stdin to stdout and leaves out every page of
// one RAM block that equals the same page of a base file.
//
// A sandbox restored from a template maps the template's memory file copy-on-write, and when it is
// paused, QEMU streams all of its RAM: ~45 MB for an idle 256 MiB guest that changed a few hundred
// pages. Loaded again over that same file, only the changed pages are needed; the smaller stream
// loads faster and the resumed QEMU keeps sharing the template's pages instead of holding a private
// copy of everything. Usage: ramdiff -base FILE -block NAME <full-stream >diff-stream.
//
// The stream format is QEMU 7.2's precopy format (migration/savevm.c, migration/ram.c); anything this
// does not know (other iterable sections, compressed or XBZRLE pages) ends it with exit status 2, and
// the caller then takes the whole stream instead.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"syscall"
	"time"
)

func main() {
	base := flag.String("base", "", "the memory file the restore maps under the stream")
	block := flag.String("block", "", "the RAM block the base file holds (QEMU's memory backend id)")
	pid := flag.Int("pid", 0, "the QEMU that maps the base file: compare only the pages it wrote")
	flag.Parse()
	if *base == "" || *block == "" || flag.NArg() != 0 {
		fail(fmt.Errorf("usage: ramdiff -base FILE -block NAME <stream >diff"))
	}
	file, mem, err := mapFile(*base)
	if err != nil {
		fail(err)
	}
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	out := bufio.NewWriterSize(os.Stdout, 1<<20)
	f := newFilter(in, out, *block, mem)
	start := time.Now()
	if *pid != 0 {
		if f.changed, err = changedPages(*pid, file, len(mem)); err != nil {
			fail(err)
		}
	}
	mapped := time.Since(start)
	if err := f.run(); err != nil {
		fail(err)
	}
	if err := out.Flush(); err != nil {
		fail(fmt.Errorf("writing the stream: %w", err))
	}
	fmt.Fprintf(os.Stderr, "ramdiff: kept %d of %d pages of block %s in %.1f ms (pagemap %.1f ms)\n",
		f.kept, f.kept+f.dropped, *block, ms(time.Since(start)), ms(mapped))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func fail(err error) {
	fmt.Fprintf(os.Stderr, "ramdiff: %v\n", err)
	os.Exit(2)
}

// mapFile maps the base file read-only: the pages compared are read straight from the page cache
// that the sandboxes' QEMUs map too.
func mapFile(path string) (*os.File, []byte, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	st, err := file.Stat()
	if err != nil {
		return nil, nil, err
	}
	if st.Size() == 0 {
		return file, []byte{}, nil
	}
	mem, err := syscall.Mmap(int(file.Fd()), 0, int(st.Size()), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("mapping %s: %w", path, err)
	}
	return file, mem, nil
}
