// tlogcheck: an independent check of a Custody transparency log with Go's golang.org/x/mod/sumdb/note (signed
// notes) and golang.org/x/mod/sumdb/tlog (RFC 6962 proofs, tiles), the implementations the Go checksum database
// runs on. Not Custody code: tests/test_tlog_interop.py runs it against a real custody serve.
//
// Input (stdin, JSON): {"url", "vkey", "checkpoint", "old_size", "old_root", "consistency": [b64...],
// "inclusions": [{"index", "event_hash", "proof": [b64...]}]}. It verifies the checkpoint's signature with the
// vkey, every inclusion proof and the consistency proof as Custody served them, then proves the same from the
// tiles it fetches over HTTP (mapping sumdb's tile/8/L/N paths to tlog-tiles' tile/L/N) and compares. Prints one
// "OK ..." line per check; exits 1 at the first failure.
package main

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

type inclusion struct {
	Index     int64    `json:"index"`
	EventHash string   `json:"event_hash"`
	Proof     []string `json:"proof"`
}

type input struct {
	URL         string      `json:"url"`
	Vkey        string      `json:"vkey"`
	Checkpoint  string      `json:"checkpoint"`
	OldSize     int64       `json:"old_size"`
	OldRoot     string      `json:"old_root"`
	Consistency []string    `json:"consistency"`
	Inclusions  []inclusion `json:"inclusions"`
}

func fail(format string, args ...interface{}) {
	fmt.Printf("FAIL: "+format+"\n", args...)
	os.Exit(1)
}

func hashes(items []string) []tlog.Hash {
	out := make([]tlog.Hash, len(items))
	for i, item := range items {
		raw, err := base64.StdEncoding.DecodeString(item)
		if err != nil || len(raw) != tlog.HashSize {
			fail("proof hash %d is not a base64 SHA-256 hash", i)
		}
		copy(out[i][:], raw)
	}
	return out
}

type httpTiles struct{ url string }

func (r httpTiles) Height() int { return 8 }

func (r httpTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, tile := range tiles {
		path := strings.Replace(tile.Path(), "tile/8/", "tile/", 1)
		path = strings.Replace(path, "tile/data/", "tile/entries/", 1)
		resp, err := http.Get(r.url + "/" + path)
		if err != nil {
			return nil, err
		}
		data, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			return nil, fmt.Errorf("GET %s: %d %v", path, resp.StatusCode, err)
		}
		out[i] = data
	}
	return out, nil
}

func (r httpTiles) SaveTiles(tiles []tlog.Tile, data [][]byte) {}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail("input: %v", err)
	}
	verifier, err := note.NewVerifier(in.Vkey)
	if err != nil {
		fail("vkey: %v", err)
	}
	signed, err := note.Open([]byte(in.Checkpoint), note.VerifierList(verifier))
	if err != nil {
		fail("checkpoint signature: %v", err)
	}
	lines := strings.Split(signed.Text, "\n")
	if len(lines) < 4 || lines[0] != verifier.Name() {
		fail("checkpoint text is not origin, size, root: %q", signed.Text)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		fail("checkpoint size: %v", err)
	}
	root := hashes([]string{lines[2]})[0]
	fmt.Printf("OK: checkpoint of %s, size %d, signed by %s\n", lines[0], size, verifier.Name())

	reader := tlog.TileHashReader(tlog.Tree{N: size, Hash: root}, httpTiles{in.URL})
	treeHash, err := tlog.TreeHash(size, reader)
	if err != nil || treeHash != root {
		fail("tree hash from the tiles: %v (%v, want %v)", err, treeHash, root)
	}
	fmt.Printf("OK: the tiles give the checkpoint's root\n")

	for _, item := range in.Inclusions {
		data, err := hex.DecodeString(item.EventHash)
		if err != nil {
			fail("event hash %q: %v", item.EventHash, err)
		}
		leaf := tlog.RecordHash(data)
		if err := tlog.CheckRecord(hashes(item.Proof), size, root, item.Index, leaf); err != nil {
			fail("inclusion proof of leaf %d as Custody served it: %v", item.Index, err)
		}
		own, err := tlog.ProveRecord(size, item.Index, reader)
		if err != nil {
			fail("inclusion proof of leaf %d from the tiles: %v", item.Index, err)
		}
		if len(own) != len(item.Proof) {
			fail("inclusion proof of leaf %d: %d hashes from the tiles, %d served", item.Index, len(own), len(item.Proof))
		}
		for i, h := range hashes(item.Proof) {
			if own[i] != h {
				fail("inclusion proof of leaf %d: hash %d differs from the tiles'", item.Index, i)
			}
		}
		fmt.Printf("OK: leaf %d is in the tree of size %d\n", item.Index, size)
	}

	oldRoot := hashes([]string{in.OldRoot})[0]
	if err := tlog.CheckTree(hashes(in.Consistency), size, root, in.OldSize, oldRoot); err != nil {
		fail("consistency proof %d -> %d as Custody served it: %v", in.OldSize, size, err)
	}
	own, err := tlog.ProveTree(size, in.OldSize, reader)
	if err != nil || len(own) != len(in.Consistency) {
		fail("consistency proof from the tiles: %v", err)
	}
	for i, h := range hashes(in.Consistency) {
		if own[i] != h {
			fail("consistency proof: hash %d differs from the tiles'", i)
		}
	}
	fmt.Printf("OK: the tree of size %d extends the tree of size %d\n", size, in.OldSize)
}
