"""gRPC service for MEND edits: servicer, interceptor, server lifecycle, client. grpc lives only here."""
