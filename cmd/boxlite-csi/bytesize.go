package main

import (
	"fmt"
	"strconv"
	"strings"
)

// byteSize is a flag holding a size in bytes, written as plain bytes or
// with a binary (Ki, Mi, Gi, Ti) or decimal (K, M, G, T) suffix, the way
// Kubernetes quantities are.
type byteSize int64

var sizeSuffixes = []struct {
	suffix string
	mult   int64
}{
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
	{"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12},
}

func (b *byteSize) String() string { return strconv.FormatInt(int64(*b), 10) }

func (b *byteSize) Set(s string) error {
	n, mult := strings.TrimSpace(s), int64(1)
	for _, sf := range sizeSuffixes {
		if strings.HasSuffix(n, sf.suffix) {
			n, mult = strings.TrimSuffix(n, sf.suffix), sf.mult
			break
		}
	}
	v, err := strconv.ParseInt(n, 10, 64)
	if err != nil || v < 0 {
		return fmt.Errorf("size %q: want a non-negative number of bytes, optionally with Ki, Mi, Gi, Ti, K, M, G or T", s)
	}
	if v > (1<<63-1)/mult {
		return fmt.Errorf("size %q overflows", s)
	}
	*b = byteSize(v * mult)
	return nil
}
