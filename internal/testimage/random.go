package testimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"math/rand/v2"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Random is a pseudo-random image for benchmarks: files regular files in
// total (spread over layers layers and directories of about 64 files)
// holding totalBytes of text-like, compressible content. The same seed
// and sizes give the same digest. Layers are gzipped at BestSpeed and kept
// in memory compressed (text compresses about 3:1).
func Random(t testing.TB, seed int64, layers, files int, totalBytes int64) v1.Image {
	t.Helper()
	if layers < 1 || files < layers || totalBytes < 0 {
		t.Fatalf("testimage.Random: need 1 <= layers <= files and totalBytes >= 0 (got %d, %d, %d)", layers, files, totalBytes)
	}
	rng := rand.New(rand.NewPCG(uint64(seed), 0x5eed))
	words := vocabulary(rng)

	// File sizes: exponentially distributed, scaled to totalBytes.
	weights := make([]float64, files)
	var sum float64
	for i := range weights {
		weights[i] = rng.ExpFloat64() + 0.01
		sum += weights[i]
	}
	sizes := make([]int64, files)
	var assigned int64
	for i := range sizes {
		sizes[i] = int64(float64(totalBytes) * weights[i] / sum)
		assigned += sizes[i]
	}
	sizes[files-1] += totalBytes - assigned

	var out []v1.Layer
	mtime := Created
	fileNo := 0
	for l := 0; l < layers; l++ {
		n := files / layers
		if l < files%layers {
			n++
		}
		var buf bytes.Buffer
		zw := newGzip(&buf, gzip.BestSpeed)
		tw := tar.NewWriter(zw)
		dirs := map[string]bool{}
		for i := 0; i < n; i++ {
			dir := fmt.Sprintf("data/d%04d", fileNo/64)
			for _, d := range []string{"data", dir} {
				if !dirs[d] {
					dirs[d] = true
					if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
						t.Fatal(err)
					}
				}
			}
			hdr := &tar.Header{
				Typeflag: tar.TypeReg,
				Name:     fmt.Sprintf("%s/f%06d.txt", dir, fileNo),
				Mode:     0o644,
				Size:     sizes[fileNo],
				ModTime:  mtime,
				Format:   tar.FormatPAX,
			}
			if err := tw.WriteHeader(hdr); err != nil {
				t.Fatal(err)
			}
			if err := writeText(tw, rng, words, sizes[fileNo]); err != nil {
				t.Fatal(err)
			}
			fileNo++
		}
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		out = append(out, layerFromGzip(t, buf.Bytes()))
	}
	return build(t, v1.Config{Cmd: []string{"/bin/true"}}, out...)
}

// vocabulary makes 512 pseudo-words of 2 to 10 letters.
func vocabulary(rng *rand.Rand) [][]byte {
	words := make([][]byte, 512)
	for i := range words {
		w := make([]byte, 2+rng.IntN(9))
		for j := range w {
			w[j] = byte('a' + rng.IntN(26))
		}
		words[i] = w
	}
	return words
}

// writeText writes exactly n bytes of words, spaces and newlines.
func writeText(w *tar.Writer, rng *rand.Rand, words [][]byte, n int64) error {
	var chunk [64 << 10]byte
	for n > 0 {
		b := chunk[:0]
		lim := int64(len(chunk)) - 16
		if n < lim {
			lim = n
		}
		col := 0
		for int64(len(b)) < lim {
			word := words[rng.IntN(len(words))]
			b = append(b, word...)
			col += len(word) + 1
			if col > 72 {
				b = append(b, '\n')
				col = 0
			} else {
				b = append(b, ' ')
			}
		}
		if int64(len(b)) > n {
			b = b[:n]
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
		n -= int64(len(b))
	}
	return nil
}
