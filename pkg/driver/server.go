package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// listen opens the CSI endpoint: unix:///path (or unix:path) or
// tcp://host:port. A socket file left by a dead plugin is removed first;
// one a live process still answers on is not.
func listen(endpoint string) (net.Listener, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	switch u.Scheme {
	case "unix":
		p := u.Path
		if p == "" {
			p = u.Opaque
		}
		if p == "" || !filepath.IsAbs(p) {
			return nil, fmt.Errorf("endpoint %q: want unix:///absolute/path", endpoint)
		}
		if err := removeStaleSocket(p); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
			return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
		}
		l, err := net.Listen("unix", p)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", p, err)
		}
		return l, nil
	case "tcp":
		l, err := net.Listen("tcp", u.Host)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", u.Host, err)
		}
		return l, nil
	default:
		return nil, fmt.Errorf("endpoint %q: scheme must be unix or tcp", endpoint)
	}
}

func removeStaleSocket(p string) error {
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat socket %s: %w", p, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; refusing to remove it", p)
	}
	if c, err := net.DialTimeout("unix", p, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("socket %s is in use by a live process", p)
	}
	if err := os.Remove(p); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", p, err)
	}
	return nil
}

// interceptor logs every call with its secrets stripped, and makes sure
// every error leaves as a gRPC status: a bare error would reach the CO as
// Unknown, which tells it nothing about whether to retry.
func (d *Driver) interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	log := klog.FromContext(ctx).WithValues("method", info.FullMethod)
	ctx = klog.NewContext(ctx, log)
	log.V(3).Info("GRPC call", "request", protosanitizer.StripSecrets(req))
	start := time.Now()
	resp, err := handler(ctx, req)
	if err != nil {
		if _, ok := status.FromError(err); !ok {
			err = status.Error(codes.Internal, err.Error())
		}
		log.Error(err, "GRPC error", "code", status.Code(err), "duration", time.Since(start))
	} else {
		log.V(5).Info("GRPC response", "response", protosanitizer.StripSecrets(resp), "duration", time.Since(start))
	}
	d.cfg.Metrics.ObserveRPC(info.FullMethod, status.Code(err).String(), time.Since(start))
	return resp, err
}
