package mountinfo

import "testing"

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/a/b`:                 "/a/b",
		`/a/base\040old/x`:     "/a/base old/x",
		`/t\011ab\012nl\134bs`: "/t\tab\nnl\\bs",
		`/short\04`:            `/short\04`,
		`/not\999octal`:        `/not\999octal`,
		`/trailing\`:           `/trailing\`,
	} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRead(t *testing.T) {
	infos, err := Read()
	if err != nil || len(infos) == 0 {
		t.Fatalf("Read = %d mounts, %v", len(infos), err)
	}
}
