def preload(parser):
    parser.add_argument(
        "--seg-disable",
        action="store_true",
        help="Smoothed Energy Guidance: hide the script and install none of its hooks or callbacks",
    )
